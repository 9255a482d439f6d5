import sys,collections,statistics as st
for fn in sys.argv[1:]:
    R=[list(map(int,l.split())) for l in open(fn)]
    # i g0 g1 sm iters c1 c2 c3 c4 nb
    t0=min(r[1] for r in R); t1=max(r[2] for r in R)
    print('==',fn,'CTAs',len(R),'span us %.1f'%((t1-t0)/1e3))
    c1=[r[5] for r in R if r[4]>0]; c2=[r[6] for r in R if r[4]>0]; c3=[r[7] for r in R]; c4=[r[8] for r in R]
    loop=[(r[7]-r[6])/r[4] for r in R if r[4]>0]
    print(' kv-ready cyc med %d  first-Q med %d  epilogue(c4-c3) med %d  per-iter med %.0f  (p10 %.0f p90 %.0f)'%(
        st.median(c1),st.median(c2),st.median([r[8]-r[7] for r in R]),st.median(loop),
        sorted(loop)[len(loop)//10],sorted(loop)[9*len(loop)//10]))
    # per SM: busy vs span
    by=collections.defaultdict(list)
    for r in R: by[r[3]].append(r)
    gaps=[];busy=[];ends=[];starts=[]
    for sm,rs in by.items():
        rs.sort(key=lambda r:r[1])
        busy.append(sum(r[2]-r[1] for r in rs)); ends.append(rs[-1][2]-t0); starts.append(rs[0][1]-t0)
        for a,b in zip(rs,rs[1:]): gaps.append(b[1]-a[2])
    print(' per SM: CTAs %.1f busy med %.1f us, last end min %.1f med %.1f max %.1f us; first start max %.1f; gap between CTAs med %.0f ns p90 %.0f'%(
        len(R)/len(by), st.median(busy)/1e3, min(ends)/1e3, st.median(ends)/1e3, max(ends)/1e3, max(starts)/1e3, st.median(gaps), sorted(gaps)[9*len(gaps)//10]))
    # overhead model: duration vs iters (globaltimer ns)
    xs=[r[4] for r in R]; ys=[r[2]-r[1] for r in R]
    n=len(xs); mx=sum(xs)/n; my=sum(ys)/n
    b=sum((x-mx)*(y-my) for x,y in zip(xs,ys))/sum((x-mx)**2 for x in xs) if len(set(xs))>1 else 0
    print(' CTA duration ns = %.0f + %.0f * iters (fit)'%(my-b*mx,b), ' mean dur %.0f ns, mean iters %.1f'%(my,mx))
